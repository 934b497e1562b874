"""The world-facts table, written by the project: countries (capital,
continent, official language, currency), chemical elements and well-known
cities. Only public, stable facts; "-" marks a fact left out because it is
not clear-cut (several official languages, a moving or disputed capital)."""

# country | capital | continent | official language | currency   ("-": left out, not clear-cut)
COUNTRIES = """
France|Paris|Europe|French|euro
Germany|Berlin|Europe|German|euro
Italy|Rome|Europe|Italian|euro
Spain|Madrid|Europe|Spanish|euro
Portugal|Lisbon|Europe|Portuguese|euro
Netherlands|Amsterdam|Europe|Dutch|euro
Belgium|Brussels|Europe|-|euro
Austria|Vienna|Europe|German|euro
Switzerland|Bern|Europe|-|Swiss franc
Greece|Athens|Europe|Greek|euro
Ireland|Dublin|Europe|-|euro
United Kingdom|London|Europe|English|pound sterling
Sweden|Stockholm|Europe|Swedish|Swedish krona
Norway|Oslo|Europe|Norwegian|Norwegian krone
Denmark|Copenhagen|Europe|Danish|Danish krone
Finland|Helsinki|Europe|-|euro
Iceland|Reykjavik|Europe|Icelandic|Icelandic krona
Poland|Warsaw|Europe|Polish|Polish zloty
Czech Republic|Prague|Europe|Czech|Czech koruna
Hungary|Budapest|Europe|Hungarian|Hungarian forint
Romania|Bucharest|Europe|Romanian|Romanian leu
Croatia|Zagreb|Europe|Croatian|euro
Serbia|Belgrade|Europe|Serbian|Serbian dinar
Ukraine|Kyiv|Europe|Ukrainian|Ukrainian hryvnia
Slovakia|Bratislava|Europe|Slovak|euro
Slovenia|Ljubljana|Europe|Slovene|euro
Estonia|Tallinn|Europe|Estonian|euro
Latvia|Riga|Europe|Latvian|euro
Lithuania|Vilnius|Europe|Lithuanian|euro
Belarus|Minsk|Europe|-|Belarusian ruble
Albania|Tirana|Europe|Albanian|Albanian lek
Malta|Valletta|Europe|-|euro
Russia|Moscow|-|Russian|Russian ruble
Turkey|Ankara|-|Turkish|Turkish lira
Egypt|Cairo|Africa|Arabic|Egyptian pound
Morocco|Rabat|Africa|-|Moroccan dirham
Nigeria|Abuja|Africa|English|Nigerian naira
Kenya|Nairobi|Africa|-|Kenyan shilling
Ethiopia|Addis Ababa|Africa|Amharic|Ethiopian birr
Ghana|Accra|Africa|English|Ghanaian cedi
Senegal|Dakar|Africa|French|CFA franc
Algeria|Algiers|Africa|Arabic|Algerian dinar
Tunisia|Tunis|Africa|Arabic|Tunisian dinar
Uganda|Kampala|Africa|-|Ugandan shilling
Angola|Luanda|Africa|Portuguese|Angolan kwanza
Mozambique|Maputo|Africa|Portuguese|Mozambican metical
Madagascar|Antananarivo|Africa|-|Malagasy ariary
Libya|Tripoli|Africa|Arabic|Libyan dinar
Sudan|Khartoum|Africa|-|Sudanese pound
Mali|Bamako|Africa|-|CFA franc
Niger|Niamey|Africa|-|CFA franc
Cameroon|Yaounde|Africa|-|CFA franc
Rwanda|Kigali|Africa|-|Rwandan franc
Somalia|Mogadishu|Africa|-|Somali shilling
Zambia|Lusaka|Africa|English|Zambian kwacha
Botswana|Gaborone|Africa|-|Botswana pula
Namibia|Windhoek|Africa|English|Namibian dollar
China|Beijing|Asia|Chinese|Chinese yuan
Japan|Tokyo|Asia|Japanese|Japanese yen
South Korea|Seoul|Asia|Korean|South Korean won
North Korea|Pyongyang|Asia|Korean|North Korean won
India|New Delhi|Asia|-|Indian rupee
Pakistan|Islamabad|Asia|-|Pakistani rupee
Bangladesh|Dhaka|Asia|Bengali|Bangladeshi taka
Thailand|Bangkok|Asia|Thai|Thai baht
Vietnam|Hanoi|Asia|Vietnamese|Vietnamese dong
Philippines|Manila|Asia|-|Philippine peso
Malaysia|Kuala Lumpur|Asia|Malay|Malaysian ringgit
Iran|Tehran|Asia|Persian|Iranian rial
Iraq|Baghdad|Asia|-|Iraqi dinar
Saudi Arabia|Riyadh|Asia|Arabic|Saudi riyal
Afghanistan|Kabul|Asia|-|Afghan afghani
Nepal|Kathmandu|Asia|Nepali|Nepalese rupee
Mongolia|Ulaanbaatar|Asia|Mongolian|Mongolian tugrik
Kazakhstan|Astana|Asia|-|Kazakhstani tenge
Qatar|Doha|Asia|Arabic|Qatari riyal
Syria|Damascus|Asia|Arabic|Syrian pound
Jordan|Amman|Asia|Arabic|Jordanian dinar
Lebanon|Beirut|Asia|Arabic|Lebanese pound
Uzbekistan|Tashkent|Asia|Uzbek|Uzbekistani som
Kyrgyzstan|Bishkek|Asia|-|Kyrgyzstani som
Tajikistan|Dushanbe|Asia|Tajik|Tajikistani somoni
Turkmenistan|Ashgabat|Asia|Turkmen|Turkmenistani manat
Cambodia|Phnom Penh|Asia|Khmer|Cambodian riel
Laos|Vientiane|Asia|Lao|Lao kip
Oman|Muscat|Asia|Arabic|Omani rial
Kuwait|Kuwait City|Asia|Arabic|Kuwaiti dinar
United Arab Emirates|Abu Dhabi|Asia|Arabic|UAE dirham
Singapore|Singapore|Asia|-|Singapore dollar
Israel|-|Asia|Hebrew|Israeli new shekel
United States|Washington, D.C.|North America|-|United States dollar
Canada|Ottawa|North America|-|Canadian dollar
Mexico|Mexico City|North America|Spanish|Mexican peso
Cuba|Havana|North America|Spanish|Cuban peso
Jamaica|Kingston|North America|English|Jamaican dollar
Guatemala|Guatemala City|North America|Spanish|Guatemalan quetzal
Honduras|Tegucigalpa|North America|Spanish|Honduran lempira
Costa Rica|San Jose|North America|Spanish|Costa Rican colon
Nicaragua|Managua|North America|Spanish|Nicaraguan cordoba
Dominican Republic|Santo Domingo|North America|Spanish|Dominican peso
Haiti|Port-au-Prince|North America|-|Haitian gourde
El Salvador|San Salvador|North America|Spanish|-
Panama|Panama City|North America|Spanish|-
Brazil|Brasilia|South America|Portuguese|Brazilian real
Argentina|Buenos Aires|South America|Spanish|Argentine peso
Chile|Santiago|South America|Spanish|Chilean peso
Peru|Lima|South America|-|Peruvian sol
Colombia|Bogota|South America|Spanish|Colombian peso
Venezuela|Caracas|South America|Spanish|-
Uruguay|Montevideo|South America|Spanish|Uruguayan peso
Paraguay|Asuncion|South America|-|Paraguayan guarani
Ecuador|Quito|South America|Spanish|-
Australia|Canberra|Oceania|-|Australian dollar
New Zealand|Wellington|Oceania|-|New Zealand dollar
Fiji|Suva|Oceania|-|Fijian dollar
Papua New Guinea|Port Moresby|Oceania|-|Papua New Guinean kina
"""

# element | symbol
ELEMENTS = """
hydrogen|H
helium|He
lithium|Li
beryllium|Be
boron|B
carbon|C
nitrogen|N
oxygen|O
fluorine|F
neon|Ne
sodium|Na
magnesium|Mg
aluminium|Al
silicon|Si
phosphorus|P
sulfur|S
chlorine|Cl
argon|Ar
potassium|K
calcium|Ca
titanium|Ti
chromium|Cr
manganese|Mn
iron|Fe
cobalt|Co
nickel|Ni
copper|Cu
zinc|Zn
arsenic|As
selenium|Se
bromine|Br
krypton|Kr
strontium|Sr
silver|Ag
tin|Sn
iodine|I
xenon|Xe
barium|Ba
tungsten|W
platinum|Pt
gold|Au
mercury|Hg
lead|Pb
radon|Rn
radium|Ra
uranium|U
plutonium|Pu
zirconium|Zr
cadmium|Cd
antimony|Sb
bismuth|Bi
cesium|Cs
gallium|Ga
germanium|Ge
rubidium|Rb
vanadium|V
scandium|Sc
palladium|Pd
osmium|Os
iridium|Ir
"""

# city | country: well-known cities that are not capitals (ambiguous names left out)
CITIES = """
Sydney|Australia
Melbourne|Australia
Brisbane|Australia
Perth|Australia
Toronto|Canada
Vancouver|Canada
Montreal|Canada
Calgary|Canada
New York|United States
Los Angeles|United States
Chicago|United States
San Francisco|United States
Houston|United States
Seattle|United States
Boston|United States
Miami|United States
Las Vegas|United States
Mumbai|India
Kolkata|India
Bangalore|India
Chennai|India
Hyderabad|India
Shanghai|China
Guangzhou|China
Shenzhen|China
Chengdu|China
Wuhan|China
Osaka|Japan
Kyoto|Japan
Yokohama|Japan
Hiroshima|Japan
Busan|South Korea
Istanbul|Turkey
Izmir|Turkey
Barcelona|Spain
Seville|Spain
Valencia|Spain
Bilbao|Spain
Milan|Italy
Venice|Italy
Florence|Italy
Naples|Italy
Turin|Italy
Munich|Germany
Hamburg|Germany
Frankfurt|Germany
Cologne|Germany
Marseille|France
Lyon|France
Nice|France
Bordeaux|France
Manchester|United Kingdom
Liverpool|United Kingdom
Edinburgh|United Kingdom
Glasgow|United Kingdom
Birmingham|United Kingdom
Rotterdam|Netherlands
Zurich|Switzerland
Geneva|Switzerland
Porto|Portugal
Krakow|Poland
Gdansk|Poland
Saint Petersburg|Russia
Novosibirsk|Russia
Rio de Janeiro|Brazil
Sao Paulo|Brazil
Salvador|Brazil
Casablanca|Morocco
Marrakesh|Morocco
Johannesburg|South Africa
Durban|South Africa
Lagos|Nigeria
Alexandria|Egypt
Dubai|United Arab Emirates
Jeddah|Saudi Arabia
Mecca|Saudi Arabia
Karachi|Pakistan
Lahore|Pakistan
Ho Chi Minh City|Vietnam
Chiang Mai|Thailand
Auckland|New Zealand
Guadalajara|Mexico
Monterrey|Mexico
Medellin|Colombia
Mombasa|Kenya
Gothenburg|Sweden
"""

# The facts SmolLM2-135M-Instruct (the embedded model) does not answer under
# choice scoring, fp32, with the questions of the default deal: what
# WORLD_FACTS_KNOWN leaves out. Written by
# `python tests/benchmarks/pretrained_knowledge.py --unknown`.
UNKNOWN_TO_EMBEDDED = frozenset({
    'capital|Botswana',
    'capital|Cameroon',
    'capital|Honduras',
    'capital|Jordan',
    'capital|Kyrgyzstan',
    'capital|Laos',
    'capital|Morocco',
    'capital|Namibia',
    'capital|New Zealand',
    'capital|Niger',
    'capital|Papua New Guinea',
    'capital|Paraguay',
    'capital|Tajikistan',
    'capital|Turkey',
    'capital|Uganda',
    'capital|United States',
    'city|Gothenburg',
    'city|Karachi',
    'city|Krakow',
    'city|Medellin',
    'city|Monterrey',
    'continent|Afghanistan',
    'continent|Australia',
    'continent|Bangladesh',
    'continent|Brazil',
    'continent|Cambodia',
    'continent|Canada',
    'continent|Chile',
    'continent|Costa Rica',
    'continent|Croatia',
    'continent|Cuba',
    'continent|Dominican Republic',
    'continent|El Salvador',
    'continent|Fiji',
    'continent|Guatemala',
    'continent|Haiti',
    'continent|Honduras',
    'continent|India',
    'continent|Iran',
    'continent|Iraq',
    'continent|Israel',
    'continent|Jamaica',
    'continent|Jordan',
    'continent|Kazakhstan',
    'continent|Kuwait',
    'continent|Kyrgyzstan',
    'continent|Laos',
    'continent|Lebanon',
    'continent|Mexico',
    'continent|Mongolia',
    'continent|Nepal',
    'continent|New Zealand',
    'continent|Nicaragua',
    'continent|North Korea',
    'continent|Oman',
    'continent|Pakistan',
    'continent|Panama',
    'continent|Papua New Guinea',
    'continent|Peru',
    'continent|Qatar',
    'continent|Syria',
    'continent|Turkmenistan',
    'continent|United Arab Emirates',
    'continent|United States',
    'continent|Uzbekistan',
    'continent|Venezuela',
    'continent|Vietnam',
    'currency|Afghanistan',
    'currency|Austria',
    'currency|Bangladesh',
    'currency|Botswana',
    'currency|Costa Rica',
    'currency|Ethiopia',
    'currency|Haiti',
    'currency|Honduras',
    'currency|Hungary',
    'currency|Israel',
    'currency|Kazakhstan',
    'currency|Kyrgyzstan',
    'currency|Laos',
    'currency|Madagascar',
    'currency|Mongolia',
    'currency|Morocco',
    'currency|Mozambique',
    'currency|Nicaragua',
    'currency|Niger',
    'currency|Norway',
    'currency|Peru',
    'currency|Poland',
    'currency|Somalia',
    'currency|Tajikistan',
    'currency|Turkmenistan',
    'currency|Uganda',
    'currency|Ukraine',
    'currency|United Arab Emirates',
    'currency|Uzbekistan',
    'currency|Zambia',
    'language|Ethiopia',
    'language|Malaysia',
    'language|North Korea',
    'symbol|bismuth',
    'symbol|calcium',
    'symbol|copper',
    'symbol|gallium',
    'symbol|krypton',
    'symbol|magnesium',
    'symbol|mercury',
    'symbol|neon',
    'symbol|oxygen',
    'symbol|radium',
    'symbol|radon',
    'symbol|selenium',
    'symbol|silver',
    'symbol|strontium',
    'symbol|tin',
    'symbol|xenon',
    'symbol|zirconium',
})
